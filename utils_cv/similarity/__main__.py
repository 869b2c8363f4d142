from utils_cv.similarity.cli import main

raise SystemExit(main())
