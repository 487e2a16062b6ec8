from personalm.study.pipeline import main

main()
