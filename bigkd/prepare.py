"""`python -m bigkd.prepare`: image folder or tfds dataset -> ArrayRecord shards (data/prepare.py)."""
from bigkd.data.prepare import main
if __name__ == '__main__': main()  # noqa: E701
