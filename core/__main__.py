from bitsweep.cli import main

if __name__ == "__main__":  # not again in worker processes spawned from here (Dask's LocalCluster)
    main()
