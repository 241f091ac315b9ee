from tests.fakehub.server import main

main()
