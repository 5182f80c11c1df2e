from edgekd.cli import main

if __name__ == "__main__":  # a spawned child process (parallel export) imports this module too
    main()
