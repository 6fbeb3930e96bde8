from flowprobe.agent.cli import main

main()
