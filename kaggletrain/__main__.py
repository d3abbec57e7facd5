import sys

from kaggletrain.cli import main

sys.exit(main())
