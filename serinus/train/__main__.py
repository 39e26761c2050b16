import sys

from serinus.train import main

sys.exit(main())
