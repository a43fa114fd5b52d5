from labd.hub.core import main

main()
