"""What every layer uses: settings checks, tasks, atomic files, the file-facts cache, the
device and threads, multi-process launch. Imports nothing else of the project."""
