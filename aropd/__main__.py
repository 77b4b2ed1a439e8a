from aropd.cli import entry

entry()
