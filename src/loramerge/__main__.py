from loramerge.cli import run

run()
