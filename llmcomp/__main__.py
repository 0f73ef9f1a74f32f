from llmcomp.cli.main import main

# Guarded: worker processes started with "spawn" import the main module (``python -m llmcomp``).
if __name__ == "__main__":
    main()
