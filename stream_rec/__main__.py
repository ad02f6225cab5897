import sys

from stream_rec.cli import main

sys.exit(main())
