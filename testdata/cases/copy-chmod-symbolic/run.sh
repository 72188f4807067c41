#!/bin/sh
echo symbolic ok
