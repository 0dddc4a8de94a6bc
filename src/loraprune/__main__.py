from loraprune.cli import main
import sys
sys.exit(main())
