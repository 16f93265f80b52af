import sys

from hybridlm.cli.main import main

sys.exit(main())
