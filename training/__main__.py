from scdino.training.cli import main

main()
