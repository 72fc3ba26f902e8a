from scdino.export.cli import main

main()
