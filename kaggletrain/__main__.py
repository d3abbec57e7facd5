from kaggletrain.cli import entry

entry()
