import sys

from experiments.bench.timing import main

sys.exit(main())
