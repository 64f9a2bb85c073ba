import sys

from services.event_detector.service import main

sys.exit(main())
