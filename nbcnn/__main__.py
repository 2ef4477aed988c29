import sys

from nbcnn.cli import main

sys.exit(main())
