from edgetrio.daemon.cli import main

main()
