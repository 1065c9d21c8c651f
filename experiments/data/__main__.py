import sys

from experiments.data.datasets import main

sys.exit(main())
