import sys

from experiments.ladder.commands import main

sys.exit(main())
