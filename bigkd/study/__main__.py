"""python -m bigkd.study: see bigkd/study/__init__.py."""
import sys

from bigkd.study.command import main

sys.exit(main())
