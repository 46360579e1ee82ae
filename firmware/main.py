import node

node.run()
