#!/bin/sh
cat /app/shout.txt
echo "and hello from $WHO"
