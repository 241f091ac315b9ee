# Installed as /etc/profile.d/modelpeer.sh: every login shell talks to the local modelpeerd.
if [ -z "${HF_ENDPOINT:-}" ]; then
    export HF_ENDPOINT=http://127.0.0.1:6580
fi
