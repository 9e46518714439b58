from bitsweep.cli import main

main()
