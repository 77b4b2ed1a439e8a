from aropd.cli import main

main()
