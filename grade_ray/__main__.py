import sys

from grade_ray.cli import main

sys.exit(main())
