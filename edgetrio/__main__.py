from edgetrio.cli import main

main()
