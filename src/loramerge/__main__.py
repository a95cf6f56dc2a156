from loramerge.cli import main

main()
