"""The routing formats ``simmoe trace import`` reads (a module of its own, with no imports, so the
command line can name them without loading numpy)."""

FORMATS = ("auto", "layer-csv", "long-csv", "parquet", "jsonl", "simmoe")
