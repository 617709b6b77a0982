import sys

from fastdiff.cli import main

sys.exit(main())
