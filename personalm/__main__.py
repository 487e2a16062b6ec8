import sys

if len(sys.argv) > 1 and sys.argv[1] == "export":  # python -m personalm export --ckpt_path ...
    from personalm.training.export import main as export

    export(sys.argv[2:])
elif len(sys.argv) > 1 and sys.argv[1] == "prepare":  # python -m personalm prepare --config ...
    from personalm.data.prepare_command import main as prepare

    prepare(sys.argv[2:])
else:  # python -m personalm fit|validate|test|predict --config ...
    from personalm.cli import main

    main()
