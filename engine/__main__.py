from scdino.engine.cli import main

main()
