from aropd.console import entry

entry()
