import sys

from services.action_runner.service import main

sys.exit(main())
