from llmcomp.cli.main import main

main()
