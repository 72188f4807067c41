// Command greeter answers on $PORT with a greeting from package greet.
package main

import (
	"fmt"
	"log"
	"net/http"
	"os"

	"example.com/greeter/greet"
)

func main() {
	port := os.Getenv("PORT")
	if port == "" {
		port = "3000"
	}
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, greet.Hello("go"))
	})
	log.Printf("listening on %s", port)
	log.Fatal(http.ListenAndServe(":"+port, nil))
}
