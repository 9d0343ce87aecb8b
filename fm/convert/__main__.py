import sys

from fm.convert import main

sys.exit(main())
