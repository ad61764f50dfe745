import sys

from impl.server.main import main

sys.exit(main())
