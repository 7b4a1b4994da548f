"""`python -m bigkd.prepare`: images -> ArrayRecord shards (the code: bigkd/data/prepare.py)."""
from bigkd.data.prepare import main
if __name__ == '__main__': main()  # noqa: E701
