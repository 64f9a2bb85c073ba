import sys

from services.trigger_checker.service import main

sys.exit(main())
