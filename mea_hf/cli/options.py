"""Arguments shared by the commands that write a model folder (`convert`, `compress`, `sharpen`)."""

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_folder_output_arguments(parser, dtype_help: str | None = None) -> None:
    """--dtype of the saved weights, --out (a folder that must not exist or be empty) and --overwrite."""
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help=dtype_help)
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
