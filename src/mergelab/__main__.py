import sys

from mergelab.cli.main import main

sys.exit(main())
