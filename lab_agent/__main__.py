from lab_agent.cli import main

main()
