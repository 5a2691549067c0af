import sys

from tei_manager.cli import main

sys.exit(main())
