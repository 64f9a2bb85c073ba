import sys

from services.metric_loader.service import main

sys.exit(main())
