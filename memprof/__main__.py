from memprof.cli import run

run()
