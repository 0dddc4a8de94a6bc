import sys

from loraprune.cli import main

sys.exit(main())
